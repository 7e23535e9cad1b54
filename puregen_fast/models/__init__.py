"""The generative models: the authors' EBM (`ebm`, and `ebm_folded`, the same function with
pooling folded into its convolutions), the diffusers-compatible `unet`, the DDPM `schedule`, and
`checkpoints` (load and save in the published formats)."""
