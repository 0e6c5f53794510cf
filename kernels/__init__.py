"""Fused multi-label loss kernels (installed as fasthpa.kernels)."""
