"""One APIRouter per area: scoring, reports, health."""
