import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { runCli } from '../helpers/processes.ts';

/**
 * The local admin commands (tenant, token, audit list/verify of the control plane, failover)
 * work on the control plane alone. They used to open the whole service (keyring and region
 * stores included): run on an operator host whose keyring folder was wrong or empty, one made a
 * fresh keyring there and bound a region no server had opened yet to it, and the region's real
 * servers then refused to boot (docs/operations.md, "A replica refuses its keyring").
 */
describe('local admin commands open no keyring and no region store', function () {
  this.timeout(240_000);
  let dataDir: string;
  const env = () => ({ ...process.env, CELLCDS_DATA_DIR: dataDir, CELLCDS_LOG_LEVEL: 'silent' });
  const run = (args: string[]) => runCli(args, env());

  before(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cli-local-'));
  });
  after(() => {
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('tenant add / list / suspend / resume, token create / list, audit list / verify', () => {
    const jwks = path.join(dataDir, 'jwks.json');
    fs.writeFileSync(
      jwks,
      JSON.stringify({
        keys: [
          {
            kty: 'EC',
            crv: 'P-384',
            kid: 'k1',
            x: 'hBHtLm6g6LIWL3wPl2RQb6Dt7hd8sKK7jXgyOshsa8Q7f0ydtBdKNUqPHtcWz11r',
            y: 'LqaUdj4wTtmKNyuD5Iab4U5LoTgRWpDJBN5Jfbx8Bq7d9WntCw1Ue9djaNn-OKBs',
          },
        ],
      }),
    );
    const steps: string[][] = [
      ['tenant', 'add', '--id', 'cp-only', '--name', 'CP only', '--iss', 'https://ehr.cp.example'],
      ['tenant', 'list'],
      ['tenant', 'suspend', 'cp-only'],
      ['tenant', 'resume', 'cp-only'],
      ['token', 'create', '--role', 'auditor', '--tenant', 'cp-only'],
      ['token', 'list'],
      ['audit', 'list', '--tenant', 'cp-only'],
      ['audit', 'verify'],
    ];
    steps[0]?.push('--jwks-file', jwks);
    for (const args of steps) {
      const r = run(args);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).to.equal(0);
    }
    expect(run(['tenant', 'list']).stdout).to.include('cp-only');
    // Nothing of the data plane: no keyring folder (`keys`), no region folder, no binding.
    const made = fs.readdirSync(dataDir).sort();
    expect(made.filter((f) => !f.startsWith('control.sqlite') && f !== 'jwks.json')).to.deep.equal(
      [],
    );
  });
});
