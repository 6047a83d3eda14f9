"""The shard store: every (tensor, type) a plan set uses, kept once as a content-addressed GGUF
split file, from which any recipe is made loadable in milliseconds by links.

    STATE/store/shards/ab/<sha256>.gguf      one tensor at its fixed place, or the metadata split
    STATE/store/sources/<model>/index-*.json (tensor, type) -> sha256, per model and llama.cpp build
    STATE/store/sets/*.json                  the plan sets that use the store (kept by `prune`)
    STATE/members/<identity>/<id>-%05d-of-%05d.gguf   links llama.cpp loads as one model

`shards` reads, checks, links and prunes (no llama.cpp: the daemon's supervisor uses it);
`fill` builds missing shards with llama.cpp's quantizer (planning, `materialize`, and the
daemon's crash-isolated child).
"""
