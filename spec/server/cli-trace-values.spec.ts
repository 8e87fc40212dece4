import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

/**
 * A pack whose rule never fires because its value set names the wrong code system (NDC
 * for an RxNorm code): the author must see which let came out empty.
 */
const PACK = `id: system-typo
version: 1.0.0
title: t
publisher: p
description: d
services:
  - id: sign
    hook: order-sign
    description: d
valueSets:
  erLa:
    codes:
      - { system: 'http://hl7.org/fhir/sid/ndc', code: '1234' }
let:
  draftMeds: '%draftOrders.entry.resource.ofType(MedicationRequest)'
  erLaDrafts: "%draftMeds.where(medication.ofType(CodeableConcept).inValueSet('erLa'))"
rules:
  - id: er-la
    service: sign
    when: "%context.patientId = 'p' and %erLaDrafts.exists() and %draftMeds.count() = 1"
    card: { summary: s, indicator: warning, source: { label: x } }
tests:
  - name: ER draft fires
    service: sign
    now: '2021-03-01T12:00:00Z'
    requestFile: request.json
    expect: { fire: [er-la] }
`;

const REQUEST = {
  hook: 'order-sign',
  context: {
    patientId: 'p',
    userId: 'Practitioner/u',
    draftOrders: {
      resourceType: 'Bundle',
      type: 'collection',
      entry: [
        {
          resource: {
            resourceType: 'MedicationRequest',
            id: 'x',
            status: 'draft',
            intent: 'order',
            subject: { reference: 'Patient/p' },
            medicationCodeableConcept: { coding: [{ system: RXNORM, code: '1234' }] },
          },
        },
      ],
    },
  },
  prefetch: {},
};

/** `pack eval --trace` and `pack test`: a rule that silently never fires can be debugged. */
describe('cellcds CLI: let values in the author trace', function () {
  this.timeout(120_000);
  let work: string;
  let packFile: string;
  let requestFile: string;

  const run = (args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: {
        ...process.env,
        CELLCDS_DATA_DIR: path.join(work, 'data'),
        CELLCDS_LOG_LEVEL: 'silent',
      },
      encoding: 'utf8',
      timeout: 90_000,
    });

  before(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-trace-values-'));
    packFile = path.join(work, 'pack.yaml');
    requestFile = path.join(work, 'request.json');
    fs.writeFileSync(packFile, PACK);
    fs.writeFileSync(requestFile, JSON.stringify(REQUEST));
  });
  after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('pack eval --trace shows each let with a summary of its value, and the first false operand', () => {
    const r = run([
      'pack',
      'eval',
      packFile,
      '--request',
      requestFile,
      '--now',
      '2021-03-01T12:00:00Z',
      '--trace',
    ]);
    expect(r.status, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as {
      cards: unknown[];
      trace: Array<{ ruleId: string; status: string; firstFalse?: Record<string, unknown> }>;
      lets: Array<{ name: string; status: string; value?: string }>;
    };
    expect(out.cards).to.deep.equal([]);
    const lets = new Map(out.lets.map((l) => [l.name, l]));
    expect(lets.get('draftMeds')?.value).to.equal(`1 item: MedicationRequest/x ${RXNORM}|1234`);
    expect(lets.get('erLaDrafts')?.value).to.equal('0 items');
    const rule = out.trace.find((t) => t.ruleId === 'er-la');
    expect(rule?.status).to.equal('not-fired');
    expect(rule?.firstFalse).to.deep.equal({
      operand: 2,
      of: 3,
      expression: '%erLaDrafts.exists()',
      result: 'false',
    });
  });

  it('pack eval without --trace prints no values', () => {
    const r = run([
      'pack',
      'eval',
      packFile,
      '--request',
      requestFile,
      '--now',
      '2021-03-01T12:00:00Z',
    ]);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.not.include('1234');
    expect(JSON.parse(r.stdout)).to.deep.equal({ cards: [] });
  });

  it('pack test prints the lets and the first false operand of a failing test', () => {
    const r = run(['pack', 'test', packFile]);
    expect(r.status).to.equal(1);
    expect(r.stdout).to.include('trace er-la: not-fired');
    expect(r.stdout).to.include("first false: operand 2 of 3 '%erLaDrafts.exists()' is false");
    expect(r.stdout).to.include(`let draftMeds: 1 item: MedicationRequest/x ${RXNORM}|1234`);
    expect(r.stdout).to.include('let erLaDrafts: 0 items');
  });
});
