"""The model-management API and the RAG chat service (`erpops serve-api`): FastAPI over the registry, the release
ledger, Ollama (or another provider) and the Milvus knowledge base."""
