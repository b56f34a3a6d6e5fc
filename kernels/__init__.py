"""GPU kernels, each beside the PyTorch reference it must match (imported as flexdraft_sgl.kernels).

A kernel runs only where its hardware is (CUDA tensors); on a machine without a GPU every caller gets the reference,
and the kernels themselves are tested there under the Triton interpreter (TRITON_INTERPRET=1)."""
