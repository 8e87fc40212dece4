import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import YAML from 'yaml';
import { freePort } from '../helpers/processes.ts';

/** `npm start` with a two-region matrix: one supervised process per region. */
describe('npm start with a region matrix: one process per region', function () {
  this.timeout(120_000);
  let root: string;
  let supervisor: ChildProcess;
  let stderr = '';
  const ports: Record<string, number> = {};

  before(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-multi-'));
    ports['us-east'] = await freePort();
    ports['eu-west'] = await freePort();
    const region = (id: string, jurisdiction: string) => ({
      id,
      jurisdiction,
      publicUrl: `http://127.0.0.1:${ports[id]}`,
      storage: { dataDir: `data` },
      backupDir: `backups/${id}`,
      keyProvider: { kind: 'local-keyring', dir: `keys/${id}` },
      failover: [],
    });
    fs.writeFileSync(
      path.join(root, 'regions.yaml'),
      YAML.stringify({ regions: [region('us-east', 'US'), region('eu-west', 'EU')] }),
    );
    const env: Record<string, string | undefined> = {
      ...process.env,
      CELLCDS_DATA_DIR: root,
      CELLCDS_REGIONS_FILE: path.join(root, 'regions.yaml'),
      CELLCDS_ADMIN_TOKEN: 'q'.repeat(40),
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_LOG_LEVEL: 'warn',
    };
    delete env.CELLCDS_REGION;
    delete env.PORT;
    supervisor = spawn(process.execPath, ['--import', 'tsx', 'server/cli.ts', 'serve'], { env });
    supervisor.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const deadline = Date.now() + 90_000;
    for (const id of Object.keys(ports)) {
      for (;;) {
        const ok = await fetch(`http://127.0.0.1:${ports[id]}/readyz`).then(
          (r) => r.ok,
          () => false,
        );
        if (ok) {
          break;
        }
        if (Date.now() > deadline || supervisor.exitCode !== null) {
          throw new Error(`planes did not start:\n${stderr}`);
        }
        await new Promise((r) => setTimeout(r, 300));
      }
    }
  });
  after(async () => {
    supervisor.kill('SIGTERM');
    await new Promise((r) => supervisor.once('exit', r));
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('runs a ready plane per region, each naming its own region', async () => {
    for (const [id, port] of Object.entries(ports)) {
      const body = (await (await fetch(`http://127.0.0.1:${port}/readyz`)).json()) as {
        region: string;
        ready: boolean;
      };
      expect(body).to.include({ region: id, ready: true });
    }
    expect(stderr).to.include('one plane per region');
  });

  it("keeps each region's keys apart: a keyring per region, in its own folder", () => {
    expect(fs.existsSync(path.join(root, 'keys', 'us-east', 'us-east.keyring.json'))).to.equal(
      true,
    );
    expect(fs.existsSync(path.join(root, 'keys', 'eu-west', 'eu-west.keyring.json'))).to.equal(
      true,
    );
    expect(fs.existsSync(path.join(root, 'keys', 'us-east', 'eu-west.keyring.json'))).to.equal(
      false,
    );
  });
});
