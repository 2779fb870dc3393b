"""GGUF, llama.cpp's model file: ling models out to llama.cpp / Ollama and back.

- `arch`: ling's families as GGUF architectures — tensor names, the Q/K row order llama.cpp
  wants for Llama, and the architecture metadata, both ways;
- `vocab`: the tokenizer as GGUF metadata (byte-level BPE, its pre-tokenizer by llama.cpp's
  name, special ids, chat template), and a `tokenizer.json` rebuilt from it;
- `writer`: `save_gguf`, streaming one (quantised) tensor at a time;
- `reader`: `load_gguf`, a `.gguf` file as a ling model (what `ling.checkpoint` calls);
- `convert`: the `ling convert to-gguf` / `from-gguf` commands.

Everything goes through the `gguf` package (llama.cpp's own gguf-py), an optional
dependency: `pip install -e '.[gguf]'` from the checkout.
"""
