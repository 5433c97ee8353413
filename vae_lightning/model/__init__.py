"""The VAE in plain torch, as parts: the model, nets, likelihoods, priors, objectives, the bound."""
