#!/usr/bin/env node
// Builds the native addon.
//   node scripts/build-native.js               build (cmake-js; CUDA when nvcc is found)
//   node scripts/build-native.js --if-missing  the npm "install" step: skip when a prebuilt or built addon loads
//   node scripts/build-native.js --emu         the CUDA-emulator addon for tests (build-emu/Release/tfew.node;
//                                              cuda/emu): the CUDA backend's code running on the CPU
//   node scripts/build-native.js --emu --if-possible   the same, skipped (with the reason) where cmake or the
//                                              CUDA headers are missing: the npm "pretest" step
// Environment: TFEW_CUDA=auto|on|off (default auto), TFEW_BUILD_JOBS (default: all cores),
// TFEW_BUILD=cmake|gyp (default: cmake when it is on PATH).
// Without cmake (or with TFEW_BUILD=gyp) it uses node-gyp and binding.gyp, which builds the CPU backend only.
'use strict';
const { execFileSync, spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);

// A binary that loads and is built from these sources: one lacking what lib reads from it (buildInfo's call limits,
// lib/native.ts) is rebuilt, not kept (lib would refuse it).
function addonLoads() {
  try {
    const addon = require('node-gyp-build')(root);
    return typeof addon.buildInfo?.encoderLengthAlignment === 'number' && typeof addon.buildInfo?.maxCallTokens === 'number';
  } catch {
    return false;
  }
}

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function cudaHeadersFound() {
  const dirs = [process.env.CUDA_PATH && path.join(process.env.CUDA_PATH, 'include'), '/usr/local/cuda/include'].filter(Boolean);
  return dirs.some((d) => fs.existsSync(path.join(d, 'cuda_runtime_api.h')));
}

if (args.includes('--emu') && args.includes('--if-possible')) {
  const missing = !have('cmake') ? 'cmake is not installed' : !cudaHeadersFound() ? 'the CUDA headers (cuda_runtime_api.h) are not installed' : '';
  if (missing) {
    console.log(`[tfew] CUDA emulator addon not built: ${missing}; the cuda-emulator tests will be skipped`);
    process.exit(0);
  }
}

if (args.includes('--if-missing') && addonLoads()) {
  console.log('[tfew] native addon already present; skipping the build');
  process.exit(0);
}

const emu = args.includes('--emu');
const cuda = emu ? 'EMU' : (process.env.TFEW_CUDA || 'auto').toUpperCase();
const jobs = process.env.TFEW_BUILD_JOBS || String(os.cpus().length);
const env = { ...process.env, CMAKE_BUILD_PARALLEL_LEVEL: jobs };
if (!env.CUDACXX && fs.existsSync('/usr/local/cuda/bin/nvcc') && !have('nvcc')) env.CUDACXX = '/usr/local/cuda/bin/nvcc';

try {
  const useGyp = !emu && (process.env.TFEW_BUILD === 'gyp' || !have('cmake'));
  if (emu && !have('cmake')) throw new Error('the emulator build needs cmake');
  if (!useGyp) {
    const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
    const gen = have('ninja') ? ['-G', 'Ninja'] : [];
    execFileSync(process.execPath, [cmakeJs, 'compile', ...gen, ...(emu ? ['--out', 'build-emu'] : []), `--CDTFEW_CUDA=${cuda}`], { cwd: root, stdio: 'inherit', env });
  } else {
    console.log('[tfew] building the CPU backend with node-gyp (binding.gyp); the CUDA backend needs cmake');
    // node-gyp ships with npm; under `npm install` npm_execpath points at npm's own cli.
    const npmDir = process.env.npm_execpath ? path.resolve(path.dirname(process.env.npm_execpath), '..')
      : path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm');
    const nodeGyp = path.join(npmDir, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
    const gypArgs = [nodeGyp, 'rebuild', '-j', jobs];
    if (process.env.npm_config_nodedir) gypArgs.push(`--nodedir=${process.env.npm_config_nodedir}`);
    execFileSync(process.execPath, gypArgs, { cwd: root, stdio: 'inherit', env });
  }
} catch (e) {
  console.error(`[tfew] native build failed: ${e.message}`);
  process.exit(1);
}
