"""Several trials on one copy of the frozen base: the pack of adapters trained side by side, the probe that
measures whether packing pays on this machine, and the cost model that chooses how many share a base."""
