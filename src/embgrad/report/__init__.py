"""The embgrad report: analysis of the demo model, rich console summary, HTML page and figures."""
