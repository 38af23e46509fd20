"""Face geometry and masks: alignment to the ArcFace template, parsing masks."""
