"""Compare runs (e.g. freezing policies): a markdown table and a PNG of loss and accuracy curves
(`scripts/compare.py`). Reads run directories and W&B; imports `training` for its metrics reader."""
