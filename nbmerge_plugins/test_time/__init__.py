"""Methods that adapt on unlabeled test inputs (test-time adaptation): AdaMerging (merging coefficients) and
WE-MoE (a weight-ensembling mixture of experts in the MLPs). ``_test_time`` holds their objectives and input
batches."""
