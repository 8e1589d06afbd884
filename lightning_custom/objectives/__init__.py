"""Pure training math, no Lightning: diffusion (epsilon / v prediction), flow matching, SDXL conditioning."""
