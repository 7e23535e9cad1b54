"""Images, files and manifests: data set readers (`datasets`), downloads and safe extraction
(`download`), the purified output (`writer`, `reader`, `manifest`) and the one atomic-write helper
(`io`). Knows nothing of models or the engine."""
