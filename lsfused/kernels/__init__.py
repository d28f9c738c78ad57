"""Backend kernels of the fused ops (imported lazily: optional dependencies never break ``import lsfused``)."""
