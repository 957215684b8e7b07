"""Export: a gptwo model (or any GPT-2 it loads) as files other runtimes run.

`gptwo export gguf` writes llama.cpp's GGUF (for llama.cpp and Ollama; gptwo.export.gguf) and
`gptwo export onnx` a decoder with past key values for onnxruntime (gptwo.export.onnx). Reading GGUF
back is loading, not export: gptwo.gguf. docs/export.md says what each runtime gets and its limits.
"""
