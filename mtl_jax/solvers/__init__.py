"""Solvers for MTRL: centralized (fast certified APG, classic alternation); distributed DMTRL later."""
