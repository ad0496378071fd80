"""MoE modules: routers, expert banks and the registry of expert backends that run them, the token-choice SwiGLU MoE
layer and its DeepSeek-style variant."""
