"""Outpost HQ: the control plane agents dial out to. It shares only ``protocol``, ``config`` and
``crypto`` with the agent and never imports ``state``, ``drivers`` or ``credentials``."""
