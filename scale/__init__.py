"""opd-scale: the opd_ref losses on Stable Diffusion 3 / 3.5 with LoRA (diffusers, peft, accelerate)."""
