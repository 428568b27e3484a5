"""Coordinate files from a group's own slides and annotations (`patchetl coords`).

inputs.py   slides matched to annotation files by name; the patients CSV; problems
truth.py    a slide's tumor and exclusion areas (polygons or a mask TIFF), exact point tests
geometry.py tissue shares of regions, distances to polygons, spacing between centres
sampling.py sample mode (tumor / normal centres) and grid mode
labels.py   cell labels: centre rule and tumor-area-fraction rule
splits.py   training / validation (/ testing) by slide, stratified, patients kept together
slide.py    one slide start to end: open, truth, tissue, regions, labels (a worker's job)
writers.py  MONAI datalist JSON, NCRF/MONAI CSVs, the summary JSON and table
run.py      all of it for a cohort, slides in parallel
"""
