"""The input path both stages share: dataset index, deterministic crops, DALI/PIL replay, epoch loader."""
