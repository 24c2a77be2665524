"""The report: collect the stages' outputs, check the paper's claims, draw the figures and
render report.md / report.html from templates.
"""
