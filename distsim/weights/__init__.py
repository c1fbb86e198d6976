"""Weight symmetries and features: what a trained network's weights become before they are
compared (torch and numpy, no Ray).

``normalize`` (the chain normalization rule), ``chain`` (the linearized chain of a sequential
net), ``features`` (chain-gram, gram, raw, aligned, cka: one (K, D) matrix per pack and layer),
``recurrent`` (the GRU's symmetries and features), ``alignment`` (weight matching to a template),
``cka`` (linear CKA on a probe set) and ``projection`` (the seeded sketches a study shares).
"""
