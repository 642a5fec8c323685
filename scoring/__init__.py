"""What the service and the training pipeline share, without torch.

Preprocessing, the feature-vector definition, the onnxruntime scorer engine and the
model-bundle format live here once, so that the meta classifiers see at training time
exactly the numbers they see in service (DESIGN.md section 2).
"""
