"""Export: level directories, ONNX, and the user's own class at a level's sizes."""
