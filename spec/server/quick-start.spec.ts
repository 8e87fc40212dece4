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
