"""Stand-in for comfy.samplers (0.3.64): the sampler and scheduler name lists node inputs offer."""

SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "ddim", "uni_pc"]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES
