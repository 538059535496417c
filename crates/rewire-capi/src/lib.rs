//! WSAIoctl-compatible C surface (work in progress).
