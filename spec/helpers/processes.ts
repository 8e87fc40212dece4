/**
 * Real processes for end-to-end specs: the CLI and the server exactly as a user runs them
 * (`node --import tsx server/cli.ts ...`), on a free loopback port.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import net from 'node:net';

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => {
        resolve(p);
      });
    });
  });
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

const CLI = ['--import', 'tsx', 'server/cli.ts'];

/**
 * The specs' small packs (tinyPack...) carry no tests: pack test coverage is off in the CLI and
 * server a spec starts, unless its env sets CELLCDS_PACK_TEST_COVERAGE (a coverage spec: 'required').
 */
function withSpecDefaults(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return { CELLCDS_PACK_TEST_COVERAGE: 'off', ...env };
}

/** Runs `cellcds ARGS` and waits (blocks: only for commands that need no server in this process). */
export function runCli(args: string[], env: NodeJS.ProcessEnv, timeoutMs = 90_000): CliResult {
  const r = spawnSync(process.execPath, [...CLI, ...args], {
    env: withSpecDefaults(env),
    encoding: 'utf8',
    timeout: timeoutMs,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs `cellcds ARGS` without blocking this process (e.g. against a server it hosts). */
export function runCliAsync(args: string[], env: NodeJS.ProcessEnv): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...CLI, ...args], { env: withSpecDefaults(env) });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (status) => {
      resolve({ status, stdout, stderr });
    });
  });
}

export interface ServerProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
}

/**
 * Starts `cellcds serve` and resolves once its stderr shows `ready` (default: the startup
 * banner's last line, printed with or without the demo command).
 * @throws if it exits or does not get ready within 90 s.
 */
export async function startServer(
  env: NodeJS.ProcessEnv,
  ready: (stderr: string) => boolean = (e) => e.includes('Operator token for the admin API'),
): Promise<ServerProcess> {
  const child = spawn(process.execPath, [...CLI, 'serve'], { env: withSpecDefaults(env) });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const deadline = Date.now() + 90_000;
  while (!ready(err)) {
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill('SIGKILL');
      throw new Error(`server did not start:\n${err}\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return { child, stdout: () => out, stderr: () => err };
}
