"""The samplers: the `Sampler` protocol and its reference and fast backends (`backends`), the fast
EBM Langevin loop (`langevin`), the fast DDPM loop (`ddpm`), and whole loops captured as CUDA
graphs (`cuda_graphs`)."""
