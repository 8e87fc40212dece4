#!/usr/bin/env node
// Entry point for `npx cellcds ...`: runs the TypeScript CLI through tsx (no build step).
import { register } from 'tsx/esm/api';
register();
const { runCli } = await import('../cli.ts');
const args = process.argv.slice(2);
const code = await runCli(args);
if (args[0] !== 'serve' || code !== 0) {
  process.exit(code);
}
