"""Small stand-in denoisers for the sampler and editing tests (no UNet needed).

Every stand-in is called as denoiser(x, sigma, class_labels) with sigma a Tensor [B] and records
the noise levels of its calls in `calls`, so the tests can count evaluations (NFE).
"""

import math

import torch
import torch.nn as nn


class GaussianEDM:
    """Ideal denoiser of data ~ N(mu, s^2 I): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu=0.1, s=0.5):
        self.mu, self.s = mu, s
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        self.calls.append(sigma.clone())
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.mu + self.s**2 / (self.s**2 + sig**2) * (x - self.mu)

    def ode_solution(self, x_t, t, t_end=0.0):
        """Exact probability-flow ODE solution from x_t at t to t_end: the point on the ray
        mu + sqrt(s^2 + t^2) * e."""
        ratio = math.sqrt(self.s**2 + t_end**2) / math.sqrt(self.s**2 + t**2)
        return self.mu + ratio * (x_t - self.mu)


class GaussianCM(GaussianEDM):
    """Exact consistency function of the same data: f(x, t) = the ODE solution at sigma_min.
    f(x, sigma_min) = x holds exactly."""

    def __init__(self, mu=0.1, s=0.5, sigma_min=0.002):
        super().__init__(mu, s)
        self.sigma_min = sigma_min

    def __call__(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        self.calls.append(sigma.clone())
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        ratio = math.sqrt(self.s**2 + self.sigma_min**2) / torch.sqrt(self.s**2 + sig**2)
        return self.mu + ratio * (x - self.mu)


class ConvCM(nn.Module):
    """A tiny random conv net F wrapped with the consistency boundary scalings:
    f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, class_labels)."""

    def __init__(self, channels=3, num_classes=None, sigma_min=0.002, sigma_data=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, channels, 3, padding=1)
        self.time = nn.Linear(1, 16)
        self.label = nn.Embedding(num_classes, 16) if num_classes else None
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        self.calls.append(sigma.clone())
        sd, sig = self.sigma_data, sigma.float().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        c_skip = sd**2 / ((sig - self.sigma_min) ** 2 + sd**2)
        c_out = (sig - self.sigma_min) * sd / (sig**2 + sd**2).sqrt()
        c_in = 1 / (sig**2 + sd**2).sqrt()
        emb = self.time(sig.reshape(-1, 1).log() / 4)  # (B, 16)
        if self.label is not None:
            emb = emb + self.label(class_labels)
        h = torch.tanh(self.conv1(c_in * x.float()) + emb[:, :, None, None])  # (B, 16, H, W)
        return (c_skip * x.float() + c_out * self.conv2(h)).to(x.dtype)
