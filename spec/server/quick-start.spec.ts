import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, runCli, startServer, type ServerProcess } from '../helpers/processes.ts';

/** The README quick start, run as a newcomer would: a real process on a real port. */
describe('quick start (npm start, then cellcds call --demo)', function () {
  this.timeout(120_000);
  let dataDir: string;
  let server: ServerProcess;
  let port: number;
  // Empty means unset: the server must generate its own operator token.
  const env = () => ({
    ...process.env,
    PORT: String(port),
    CELLCDS_DATA_DIR: dataDir,
    CELLCDS_ADMIN_TOKEN: '',
    CELLCDS_PUBLIC_URL: '',
  });
  const cli = (args: string[], extra: Record<string, string> = {}) =>
    runCli(args, { ...env(), ...extra });

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-qs-'));
    port = await freePort();
    server = await startServer(env());
  });

  after(() => {
    server.child.kill('SIGTERM');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('prints the base URL and the demo command', () => {
    expect(server.stderr()).to.include(`http://localhost:${port}`);
    expect(server.stderr()).to.include('npx cellcds call order-sign --demo');
  });

  it('prints a demo command that works as printed in another terminal of the same folder (off the default port and data directory, it names them)', () => {
    const line = server
      .stderr()
      .split('\n')
      .find((l) => l.includes('npx cellcds call order-sign --demo'));
    const assignments = (line ?? '').trim().split(/\s+/).slice(0, -5);
    expect(assignments).to.deep.equal([
      `CELLCDS_DATA_DIR=${fs.realpathSync(dataDir)}`,
      `CELLCDS_PUBLIC_URL=http://localhost:${port}`,
    ]);
    // A fresh terminal: none of the server's settings, only what the banner says.
    const fresh: NodeJS.ProcessEnv = Object.fromEntries(
      Object.entries(process.env).filter(
        ([name]) =>
          !['PORT', 'CELLCDS_DATA_DIR', 'CELLCDS_PUBLIC_URL', 'CELLCDS_ADMIN_TOKEN'].includes(name),
      ),
    );
    for (const a of assignments) {
      const i = a.indexOf('=');
      fresh[a.slice(0, i)] = a.slice(i + 1);
    }
    const r = runCli(['call', 'order-sign', '--demo'], fresh);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/\[(warning|critical|info)\]/);
  });

  it('writes a generated operator token with mode 0600 and never logs it', () => {
    const file = path.join(dataDir, 'admin-token');
    expect(fs.statSync(file).mode & 0o777).to.equal(0o600);
    const token = fs.readFileSync(file, 'utf8').trim();
    expect(token.length).to.be.greaterThan(32);
    expect(server.stdout()).to.not.include(token);
    expect(server.stderr()).to.not.include(token);
  });

  it('answers the demo order-sign call with cards from the shipped pack', () => {
    const r = cli(['call', 'order-sign', '--demo']);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/\[(warning|critical|info)\]/);
  });

  it('answers the demo patient-view call', () => {
    const r = cli(['call', 'patient-view', '--demo', '--json']);
    expect(r.status, r.stderr).to.equal(0);
    const body = JSON.parse(r.stdout) as { cards: unknown[] };
    expect(body.cards).to.be.an('array');
  });

  it('a refused demo call names its request id and where its reason is (a suspended demo tenant)', () => {
    expect(cli(['tenant', 'suspend', 'demo']).status).to.equal(0);
    try {
      const r = cli(['call', 'order-sign', '--demo']);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.match(/discovery refused: 401 \(request [0-9a-f-]{36}: /);
      expect(r.stderr).to.include('npx cellcds audit list --type auth.failure');
      // The command it prints names the request: run as printed, it shows that refusal alone.
      const printed =
        /npx cellcds (audit list --type auth\.failure --request-id [0-9a-f-]{36}) /.exec(r.stderr);
      expect(printed, r.stderr).to.not.equal(null);
      const shown = cli(printed![1]!.split(' '));
      expect(shown.status, shown.stderr).to.equal(0);
      const events = JSON.parse(shown.stdout) as Array<{
        type: string;
        detail: { reason: string };
      }>;
      expect(events.map((e) => [e.type, e.detail.reason])).to.deep.equal([
        ['auth.failure', 'suspended'],
      ]);
    } finally {
      expect(cli(['tenant', 'resume', 'demo']).status).to.equal(0);
    }
  });

  it('stops the boot on bad configuration, naming the setting', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', 'serve'], {
      env: { ...process.env, PORT: 'eighty', CELLCDS_DATA_DIR: dataDir },
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.status).to.equal(2);
    expect(r.stderr).to.include('PORT');
  });
});
