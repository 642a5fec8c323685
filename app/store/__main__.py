"""``python -m app.store``: bring a database's schema up to date, or write a new revision.

    python -m app.store upgrade [--database-url URL]
    python -m app.store downgrade --to REVISION [--database-url URL]   (base: drop it all)
    python -m app.store revision -m "add a column" --autogenerate [--database-url URL]

The URL defaults to GRADUNC_DATABASE_URL (else the service's default SQLite file). The
service runs ``upgrade`` itself at start-up; ``revision`` is for developers: it compares
``schema.py`` with a database migrated to head and writes the difference under
``migrations/versions/`` for review.
"""

from __future__ import annotations

import argparse
import sys

from app.store.database import alembic_config, create_store_engine, downgrade, upgrade


def main(argv: list[str] | None = None) -> int:
    from app.config import Settings

    parser = argparse.ArgumentParser(prog="python -m app.store", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("upgrade", "downgrade", "revision"))
    parser.add_argument("--to", default=None, help="downgrade: the revision to go back to")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: GRADUNC_DATABASE_URL)")
    parser.add_argument("-m", "--message", default="schema change", help="revision message")
    parser.add_argument("--autogenerate", action="store_true", help="diff schema.py vs the db")
    args = parser.parse_args(argv)
    url = args.database_url or Settings().database_url
    engine = create_store_engine(url, timeout_s=10.0)
    try:
        if args.command == "downgrade":
            if args.to is None:
                parser.error("downgrade needs --to REVISION (base: remove every table)")
            downgrade(engine, args.to)
            return 0
        upgrade(engine)
        if args.command == "revision":
            from alembic import command

            with engine.begin() as connection:
                command.revision(
                    alembic_config(connection), message=args.message, autogenerate=args.autogenerate
                )
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
