"""The method's math in plain torch: nothing here imports ComfyUI or reads files, so all of it is checked
against direct re-computations of the formulas without a model."""
