// Loaded before every test file (bunfig.toml): every --json document any command prints during the
// tests — in this process, its children and the test VM — is checked against its schema
// (lib/cli/schemas.ts); a document that drifted fails its command with exit 70.
process.env.THINIMG_CHECK_JSON = "1";
