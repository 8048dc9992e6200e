"""The paper: sources in paper/ that quote numbers only through generated macros (paper/generated/*.tex) and
show figures only from figures/, checked (`python -m ember.paper check`) and built into paper/main.pdf
(`python -m ember.paper build [--strict]`, `make paper [STRICT=1]`)."""
