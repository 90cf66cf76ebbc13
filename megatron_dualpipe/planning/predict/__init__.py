"""`plan --predict` / `plan --search`: a step-time model built from parts (see model.py)."""
