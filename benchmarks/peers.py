"""What the llmcompressor peer scripts share: our calibration windows as the dataset `oneshot` reads."""

from __future__ import annotations


def calibration_dataset(loaded, nsamples: int):
    """(tokens, datasets.Dataset) of the calibration windows our own backends calibrate on."""
    import datasets

    import layerwise
    from layerwise.calibration import CalibrationSource

    tokens = CalibrationSource(loaded, layerwise.RunSettings(nsamples=nsamples)).tokens()
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist(),
                                          "attention_mask": [[1] * tokens.shape[1]] * tokens.shape[0]})
    return tokens, dataset
