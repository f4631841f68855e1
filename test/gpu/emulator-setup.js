// The cuda-emulator jest project (jest.config.js): the GPU tests load the CUDA-emulator addon, built by
// `npm run build:emu` into build-emu/. Without it they skip, saying how to build it.
const fs = require('fs');
const path = require('path');

const addon = path.resolve(__dirname, '..', '..', 'build-emu', 'Release', 'tfew.node');
if (fs.existsSync(addon)) process.env.TFEW_NATIVE_ADDON = addon;
else process.env.TFEW_EMULATOR_MISSING = `the CUDA emulator addon ${addon} is not built (npm run build:emu)`;
