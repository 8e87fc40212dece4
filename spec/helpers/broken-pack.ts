/**
 * A pack with a file-based test whose file is missing, a rule with an invalid FHIRPath
 * expression and a rule of an unknown service; and the problems validation names for them.
 */
import path from 'node:path';
import type { PackProblem, RulePack } from '../../rules/index.ts';

export const REQUEST = {
  hook: 'patient-view',
  context: { patientId: 'p', userId: 'Practitioner/u' },
};

/** A file-based test whose file is missing, a bad FHIRPath, a rule of an unknown service. */
export function brokenPack(): RulePack {
  return {
    id: 'all-problems',
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    rules: [
      {
        id: 'always',
        service: 'svc',
        when: 'true',
        card: { summary: 'hi', indicator: 'info', source: { label: 'x' } },
      },
      {
        id: 'typo',
        service: 'svc',
        when: '%patient.gender.existss()',
        card: { summary: 'typo', indicator: 'info', source: { label: 'x' } },
      },
      {
        id: 'orphan',
        service: 'nosuch',
        when: 'true',
        card: { summary: 'orphan', indicator: 'info', source: { label: 'x' } },
      },
    ],
    tests: [
      {
        name: 'from a file',
        service: 'svc',
        now: '2021-03-01T12:00:00Z',
        requestFile: 'requests/missing.json',
        expect: { fire: ['always'] },
      },
      {
        name: 'inline',
        service: 'svc',
        now: '2021-03-01T12:00:00Z',
        request: REQUEST,
        expect: { fire: ['always'] },
      },
    ],
  };
}

/** The missing file's problem; `dir` is the pack file's folder. */
export const MISSING_FILE = (dir: string): PackProblem => ({
  path: 'tests[0].requestFile',
  message: `cannot use requests/missing.json: file not found (looked for ${path.resolve(dir, 'requests/missing.json')}; paths are relative to the pack file's folder)`,
});
export const BAD_FHIRPATH: PackProblem = {
  path: 'rules[1].when',
  message: "unknown function 'existss' at column 17",
};
export const UNKNOWN_SERVICE: PackProblem = {
  path: 'rules[2].service',
  message: "unknown service 'nosuch'",
};
