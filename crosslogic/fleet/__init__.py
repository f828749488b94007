"""The GPU fleet (issue 14): providers that give machines (SkyPilot, local simulated nodes), the autoscaler that
decides per (region, model) pool, and its policy. docs/fleet.md."""
