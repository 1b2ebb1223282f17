"""Task-vector arithmetic: methods that add the fine-tunes' differences from the base (τᵢ = θᵢ − θ₀), scaled,
sparsified, sign-elected or rescaled: task arithmetic, ExPO, TIES, DARE, DELLA, Model Breadcrumbs, SCE, MagMax,
consensus (TALL masks) and RAM."""
