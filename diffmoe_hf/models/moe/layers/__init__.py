"""MoE modules: routers, expert banks (and the backends they run their experts with), the DeepSeek-style MoE layer."""
