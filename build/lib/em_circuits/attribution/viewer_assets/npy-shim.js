// Offline stand-in for transformer-circuits' npy loader. The frontend only parses .npy files
// for hosted feature data, never for local graphs; fail with a clear message if that changes.
window.npyjs = {
  parse: function () {
    throw new Error('npy files are not supported by the offline graph viewer')
  },
}
