"""The SEDD diffusion core: graphs, noise schedules, loss, ELBO and samplers (named like the reference)."""
from .elbo import ElboEstimate, elbo, elbo_per_sequence, prior_kl
from .graph import Absorbing, Graph, Uniform, get_graph
from .noise import GeometricNoise, LogLinearNoise, get_noise, sample_times
from .parametrization import to_log_score
from .reference_loss import LossOutput, score_entropy_loss
from .sampling import Infill, analytic_step, denoise_step, euler_step, sample, sample_categorical

__all__ = [
    "Absorbing", "ElboEstimate", "GeometricNoise", "Graph", "Infill", "LogLinearNoise", "LossOutput", "Uniform",
    "analytic_step", "denoise_step", "elbo", "elbo_per_sequence", "euler_step", "get_graph", "get_noise",
    "prior_kl", "sample", "sample_categorical", "sample_times", "score_entropy_loss", "to_log_score",
]
