"""Methods that interpolate between whole models, tensor by tensor: weighted and linear averages, spherical
interpolation (SLERP, NuSLERP, multi-SLERP, the Karcher mean), Model Stock, NearSwap, Arcee Fusion and passthrough
(one model's tensor as is). ``_endpoints`` reads the two endpoints linear and SLERP share."""
