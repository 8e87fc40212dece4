import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { expect } from 'chai';
import { createApp } from '../../server/app.ts';
import { buildDeps } from '../../server/bootstrap.ts';
import { loadConfig } from '../../server/config.ts';
import { createLogger } from '../../server/logger.ts';
import { slowPack } from '../helpers/slow-pack.ts';

const PACK_DIR = path.resolve('rules/packs/medication-safety');
const PACK = path.join(PACK_DIR, 'pack.yaml');

/** The CLI as a rule author and an operator run it: real processes, real files. */
describe('cellcds CLI', function () {
  this.timeout(120_000);
  let work: string;
  let dataDir: string;
  let broken: string;

  const run = (args: string[], env: Record<string, string> = {}) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: { ...process.env, CELLCDS_DATA_DIR: dataDir, CELLCDS_LOG_LEVEL: 'silent', ...env },
      encoding: 'utf8',
      timeout: 90_000,
    });

  /** Async variant, for commands that talk to a server running in this process. */
  const runAsync = (
    args: string[],
    env: Record<string, string> = {},
    onStderr: (stderrSoFar: string) => void = () => undefined,
  ) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
        env: { ...process.env, CELLCDS_DATA_DIR: dataDir, CELLCDS_LOG_LEVEL: 'silent', ...env },
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        onStderr(stderr);
      });
      child.on('close', (status) => {
        resolve({ status, stdout, stderr });
      });
    });

  before(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cli-'));
    dataDir = path.join(work, 'data');
    // A broken copy, as a rule author's typo would make it, in the spec's own folder (never in
    // the checkout: a killed run would leave it there), its test files named absolutely.
    broken = path.join(work, 'broken.yaml');
    const text = fs
      .readFileSync(PACK, 'utf8')
      .replaceAll('../../../spec/', `${path.resolve(PACK_DIR, '../../../spec')}/`);
    const typo = text.replace(/\.exists\(\)/, '.existss()');
    expect(typo).to.not.equal(text);
    fs.writeFileSync(broken, typo.replace(/^version: .*$/m, 'version: not-semver'));
  });
  after(() => {
    fs.rmSync(broken, { force: true });
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('pack validate: ok on the shipped pack', () => {
    const r = run(['pack', 'validate', PACK]);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^ok medication-safety@\d+\.\d+\.\d+ sha256:[0-9a-f]{64}/);
  });

  it('pack validate: lists every problem with its path on a broken copy, exit 1', () => {
    const r = run(['pack', 'validate', broken]);
    expect(r.status).to.equal(1);
    expect(r.stderr).to.include('version:');
    expect(r.stderr).to.match(/unknown function 'existss' at column \d+/);
  });

  it('pack test: prints a pass/fail table, all passing', () => {
    const r = run(['pack', 'test', PACK]);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/Derek Becker .* pass/);
    expect(r.stdout).to.match(/\d+ passed, 0 failed/);
  });

  it('pack test: a failing expectation prints FAIL and the rule trace, exit 1', () => {
    const failing = path.join(PACK_DIR, `.failing-${process.pid}.yaml`);
    const text = fs.readFileSync(PACK, 'utf8');
    // Turn the Zachary Kutch negative control into a (wrong) positive expectation.
    const at = text.indexOf('Zachary Kutch');
    const i = text.indexOf('notFire:', at);
    expect(at).to.be.greaterThan(0);
    fs.writeFileSync(failing, `${text.slice(0, i)}fire:${text.slice(i + 'notFire:'.length)}`);
    try {
      const r = run(['pack', 'test', failing]);
      expect(r.status).to.equal(1);
      expect(r.stdout).to.include('FAIL');
      expect(r.stdout).to.match(/trace [a-z0-9-]+: (fired|not-fired)/);
      expect(r.stdout).to.match(/\d+ passed, [1-9]\d* failed/);
    } finally {
      fs.rmSync(failing, { force: true });
    }
  });

  it('pack test / validate: run the tests under CELLCDS_RULE_BUDGET_MS, as an upload does', () => {
    // One ~50 ms rule: within the default 500 ms per rule, over a 10 ms one (the upload's
    // verdict with that live rule budget: spec/server/upload-live-budget.spec.ts).
    const file = path.join(work, 'slow-rule.json');
    fs.writeFileSync(file, JSON.stringify(slowPack(1, 1, 'slow-rule')));
    // Its slow rule never fires by design: test coverage (pack-test-coverage.spec.ts) is off.
    const coverageOff = { CELLCDS_PACK_TEST_COVERAGE: 'off' };
    const ok = run(['pack', 'test', file], coverageOff);
    expect(ok.status, ok.stdout + ok.stderr).to.equal(0);
    expect(ok.stdout).to.include('1 passed, 0 failed');

    const tight = { ...coverageOff, CELLCDS_RULE_BUDGET_MS: '10' };
    const r = run(['pack', 'test', file], tight);
    expect(r.status, r.stdout + r.stderr).to.equal(1);
    expect(r.stdout).to.match(/case 1\s+FAIL/);
    expect(r.stdout).to.match(/trace slow-1: timeout/);
    expect(r.stdout).to.include('0 passed, 1 failed');

    const v = run(['pack', 'validate', file], tight);
    expect(v.status, v.stdout + v.stderr).to.equal(1);
    expect(v.stderr).to.match(/tests\[0\]: .*slow-1.*timeout/);
  });

  it('pack eval: prints the cards for a request file', () => {
    // The PDDI IG's own order-sign request (ketorolac draft, warfarin in prefetch).
    const r = run([
      'pack',
      'eval',
      PACK,
      '--request',
      'spec/fixtures/pddi-cds/requests/warfarin-nsaids-order-sign-no-coordination.json',
      '--now',
      '2020-03-15T12:00:00Z',
      '--trace',
    ]);
    expect(r.status, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as {
      cards: Array<{ summary: string; ruleId: string }>;
      trace: unknown[];
    };
    // Its draft has no id: the base card without a delete action (1.2.0).
    expect(out.cards.map((c) => c.ruleId)).to.include('warfarin-nsaid-draft-without-id');
    expect(out.trace.length).to.be.greaterThan(0);
  });

  it('pack eval: names the service prefetch keys the request lacks (the rules see no data there)', () => {
    // The PDDI IG's request carries its own keys (item2, item6), not the service's.
    const ig = JSON.parse(
      fs.readFileSync(
        'spec/fixtures/pddi-cds/requests/warfarin-nsaids-order-sign-no-coordination.json',
        'utf8',
      ),
    ) as { prefetch: Record<string, unknown> };
    const evalWith = (prefetch: Record<string, unknown>) => {
      const file = path.join(work, 'prefetch-request.json');
      fs.writeFileSync(file, JSON.stringify({ ...ig, prefetch }));
      return run(['pack', 'eval', PACK, '--request', file, '--now', '2020-03-15T12:00:00Z']);
    };
    const partial = evalWith({ medications: ig.prefetch['item2'], patient: null });
    expect(partial.status, partial.stderr).to.equal(0);
    expect(partial.stderr).to.include(
      "warning: the request has no prefetch for 'conditions', 'labs', 'allergies' of service medication-safety-order-sign",
    );
    const whole = evalWith({
      medications: ig.prefetch['item2'],
      patient: null,
      conditions: null,
      labs: null,
      allergies: null,
    });
    expect(whole.status, whole.stderr).to.equal(0);
    expect(whole.stderr).to.not.include('warning');
  });

  it('pack eval: --now must be an instant with its offset (exit 2)', () => {
    const req = 'spec/fixtures/pddi-cds/requests/warfarin-nsaids-order-sign-no-coordination.json';
    for (const now of ['foo', '2020-03-15T12:00:00']) {
      const r = run(['pack', 'eval', PACK, '--request', req, '--now', now]);
      expect(r.status, r.stdout).to.equal(2);
      expect(r.stderr).to.include('--now must be an instant with its offset');
    }
  });

  it('pack eval: a rule that fails is named on stderr and the exit is 1 (its card would be missing silently)', () => {
    const file = path.join(work, 'failing-rule.json');
    const pack = slowPack(0, 1, 'failing-rule');
    // More than one item where one is required: an error at run time, not at load.
    pack.rules.push({ ...pack.rules[0]!, id: 'broken', when: '(1 | 2).single() = 1' });
    fs.writeFileSync(file, JSON.stringify(pack));
    const request = path.join(work, 'failing-rule-request.json');
    fs.writeFileSync(request, JSON.stringify(pack.tests![0]!.request));
    const r = run(['pack', 'eval', file, '--request', request]);
    expect(r.status, r.stderr).to.equal(1);
    expect(JSON.parse(r.stdout.slice(0, r.stdout.lastIndexOf('}') + 1))).to.have.property('cards');
    expect(r.stderr).to.match(/warning: rule broken: error/);
    expect(r.stderr).to.include('1 rule(s) did not complete');
  });

  it("a local command run outside the server's folder refuses to create a new installation there (exit 2)", () => {
    const elsewhere = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-elsewhere-'));
    try {
      const env: NodeJS.ProcessEnv = { ...process.env, CELLCDS_LOG_LEVEL: 'silent' };
      delete env.CELLCDS_DATA_DIR;
      const commands = [
        ['tenant', 'list'],
        // An evidence report of an empty deployment would mislead an auditor.
        [
          'evidence',
          '--from',
          '2026-01-01T00:00:00Z',
          '--to',
          '2026-12-31T00:00:00Z',
          '--out',
          'ev',
        ],
        ['migrate', '--tenant', 'hosp-a', '--to', 'eu'],
      ];
      for (const command of commands) {
        const r = spawnSync(
          process.execPath,
          [
            '--import',
            pathToFileURL(path.resolve('node_modules/tsx/dist/loader.mjs')).href,
            path.resolve('server/cli.ts'),
            ...command,
          ],
          { cwd: elsewhere, env, encoding: 'utf8', timeout: 90_000 },
        );
        expect(r.status, `${command.join(' ')}: ${r.stderr}`).to.equal(2);
        expect(r.stderr).to.include(
          `no cellcds data directory at ${path.join(fs.realpathSync(elsewhere), 'var')}`,
        );
        expect(fs.readdirSync(elsewhere)).to.deep.equal([]);
      }
    } finally {
      fs.rmSync(elsewhere, { recursive: true, force: true });
    }
  });

  it('pack push: a 503 without Retry-After (a proxy, a draining server) is not retried', async () => {
    let posts = 0;
    const proxy = http.createServer((_req, res) => {
      posts++;
      res.writeHead(503, { 'content-type': 'text/plain' }).end('unavailable');
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`;
      const r = await runAsync(['pack', 'push', PACK, '--url', url, '--token', 'x'.repeat(40)]);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.not.include('retrying');
      expect(r.stderr).to.include('upload refused (503)');
      expect(posts).to.equal(1);
    } finally {
      proxy.close();
    }
  });

  it('tenant subscribe: a canary needs both its version and its percent (exit 2)', () => {
    for (const canary of [
      ['--canary-percent', '10'],
      ['--canary-version', '1.2.0'],
    ]) {
      const r = run([
        'tenant',
        'subscribe',
        'demo',
        '--pack',
        'p',
        '--version',
        '1.0.0',
        ...canary,
      ]);
      expect(r.status, r.stderr).to.equal(2);
      expect(r.stderr).to.include('a canary needs both --canary-version and --canary-percent');
    }
  });

  it('pack eval/validate: a missing file is a usage error (exit 2)', () => {
    expect(run(['pack', 'validate', 'no/such/pack.yaml']).status).to.equal(2);
  });

  it('tenant add / list / token create work on the local data directory, audited', () => {
    const jwks = path.join(work, 'jwks.json');
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
    const add = run([
      'tenant',
      'add',
      '--id',
      'cli-hosp',
      '--name',
      'CLI Hospital',
      '--iss',
      'https://ehr.cli.example',
      '--jwks-file',
      jwks,
    ]);
    expect(add.status, add.stderr).to.equal(0);
    expect(JSON.parse(add.stdout).id).to.equal('cli-hosp');
    const dup = run([
      'tenant',
      'add',
      '--id',
      'cli-hosp',
      '--name',
      'again',
      '--iss',
      'https://ehr.cli.example',
      '--jwks-file',
      jwks,
    ]);
    expect(dup.status).to.equal(1);
    expect(dup.stderr).to.match(/already exists|conflict/i);
    const list = run(['tenant', 'list']);
    expect(list.stdout).to.include('cli-hosp');
    const tok = run(['token', 'create', '--role', 'auditor', '--tenant', 'cli-hosp']);
    expect(tok.status, tok.stderr).to.equal(0);
    expect(JSON.parse(tok.stdout).token).to.be.a('string');
    const audit = run(['audit', 'list', '--tenant', 'cli-hosp']);
    expect(audit.stdout).to.include('admin.tenant.create');
    expect(audit.stdout).to.not.include(JSON.parse(tok.stdout).token as string);
  });

  it('pack push: uploads to a running server, refuses a broken pack with its problems', async () => {
    const config = loadConfig({
      CELLCDS_DATA_DIR: path.join(work, 'server'),
      CELLCDS_ADMIN_TOKEN: 'x'.repeat(40),
      CELLCDS_SEED_DEMO: 'false',
    });
    const deps = await buildDeps(config, createLogger({ level: 'silent' }));
    const server = createApp(deps).listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    try {
      const ok = await runAsync(['pack', 'push', PACK, '--url', url, '--token', 'x'.repeat(40)]);
      expect(ok.status, ok.stderr).to.equal(0);
      expect(ok.stdout).to.match(/^uploaded medication-safety@/);
      const again = await runAsync(['pack', 'push', PACK, '--url', url, '--token', 'x'.repeat(40)]);
      expect(again.stdout).to.match(/^unchanged medication-safety@/);
      const bad = await runAsync(['pack', 'push', broken, '--url', url, '--token', 'x'.repeat(40)]);
      expect(bad.status).to.equal(1);
      expect(bad.stderr).to.match(/existss/);
      const denied = await runAsync([
        'pack',
        'push',
        PACK,
        '--url',
        url,
        '--token',
        'y'.repeat(40),
      ]);
      expect(denied.status).to.equal(1);
      expect(denied.stderr).to.include('401');
    } finally {
      server.close();
      await deps.close();
    }
  });

  it('pack push: waits out a busy server (503 + Retry-After) and uploads; --wait 0 gives up at once', async () => {
    const config = loadConfig({
      CELLCDS_DATA_DIR: path.join(work, 'busy-server'),
      CELLCDS_ADMIN_TOKEN: 'x'.repeat(40),
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_PACK_UPLOADS_IN_FLIGHT: '1',
    });
    const deps = await buildDeps(config, createLogger({ level: 'silent' }));
    const server = createApp(deps).listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const port = (server.address() as AddressInfo).port;
    const url = `http://127.0.0.1:${port}`;
    // Another upload whose body has not finished arriving holds the only slot.
    const held = http.request({
      host: '127.0.0.1',
      port,
      method: 'POST',
      path: '/admin/rule-packs',
      headers: {
        authorization: `Bearer ${'x'.repeat(40)}`,
        'content-type': 'application/json',
        'content-length': '100000',
      },
    });
    held.on('error', () => undefined);
    await new Promise<void>((resolve) =>
      held.write('{"id":', () => {
        resolve();
      }),
    );
    try {
      const token = ['--url', url, '--token', 'x'.repeat(40)];
      let refused: Awaited<ReturnType<typeof runAsync>> | undefined;
      for (let attempt = 0; attempt < 20 && refused?.status !== 1; attempt++) {
        // The held request reaches the route (headers read) before this one.
        refused = await runAsync(['pack', 'push', PACK, ...token, '--wait', '0']);
      }
      expect(refused!.status, refused!.stdout).to.equal(1);
      expect(refused!.stderr).to.include('503 "unavailable"');
      expect(refused!.stderr).to.include('the server stayed busy; try again later');
      expect(refused!.stderr).to.not.include('retrying');

      const bad = await runAsync(['pack', 'push', PACK, ...token, '--wait', 'soon']);
      expect(bad.status).to.equal(2);
      expect(bad.stderr).to.include('--wait must be a whole number of seconds');

      // The slot frees once the first answer said busy (Retry-After: 10 s).
      const ok = await runAsync(['pack', 'push', PACK, ...token, '--wait', '60'], {}, (stderr) => {
        if (stderr.includes('retrying')) {
          held.destroy();
        }
      });
      expect(ok.status, ok.stderr).to.equal(0);
      expect(ok.stderr).to.match(
        /server busy \("1 pack upload is already being checked[^)]*\); retrying in 10 s/,
      );
      expect(ok.stdout).to.match(/^uploaded medication-safety@/);
    } finally {
      held.destroy();
      server.close();
      await deps.close();
    }
  });
});
