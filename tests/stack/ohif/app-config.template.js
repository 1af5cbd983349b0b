/** OHIF app-config for the bridge's local test stack; tests/stack/viewer.py serves it as /app-config.js.
 *
 * One DICOMweb data source: the local archive (Orthanc with its DICOMweb plugin), reached through
 * the viewer server's own /dicom-web proxy so that the browser stays on one origin (no CORS).
 * The launcher replaces the placeholder below with the DICOMweb root as a JSON string; a root that
 * starts with "/" is taken relative to the page's origin.
 *
 * Option names follow OHIF 3.x's documented configuration (docs.ohif.org, Configuration >
 * Configuration Files and > Data Sources > DICOMweb) and the Orthanc example of OHIF's own
 * platform/app/public/config/docker-nginx-orthanc.js.
 */
(function () {
  const configured = __BRIDGE_DICOMWEB_ROOT__;
  const root = new URL(configured, window.location.origin).href.replace(/\/+$/, '');

  // Never another person's study. OHIF's study browser lists "other studies" of the patient by a
  // QIDO-RS search on Patient ID (0010,0020) alone (extension-default getStudiesForPatientByMRN),
  // but a Patient ID is unique only within its issuer: the same ID under another Issuer of Patient
  // ID is another person. OHIF 3.x offers no setting for this, nor request hooks on its QIDO
  // client, so every study-level QIDO-RS search by Patient ID is narrowed here to the studies the
  // viewer was opened for (its StudyInstanceUIDs URL parameter). Deployed OHIF: copy this block
  // into its app-config.js (see docs/integrator-guide.md, "The viewer shows one person's study").
  const scopedStudies = () =>
    new URLSearchParams(window.location.search).getAll('StudyInstanceUIDs').join(',').split(',').filter(Boolean);
  const open = XMLHttpRequest.prototype.open;
  XMLHttpRequest.prototype.open = function (method, url, ...rest) {
    try {
      const target = new URL(url, window.location.href);
      const byPatient = target.searchParams.has('00100020') || target.searchParams.has('PatientID');
      const studySearch = target.href.startsWith(root + '/studies?') || target.href === root + '/studies';
      const studies = scopedStudies();
      if (studySearch && byPatient && studies.length && !target.searchParams.has('StudyInstanceUID')) {
        target.searchParams.set('StudyInstanceUID', studies.join(','));
        url = target.href;
      }
    } catch (error) {
      console.warn('study scoping skipped', error);
    }
    return open.call(this, method, url, ...rest);
  };

  window.config = {
    name: 'fhir-dicomweb-bridge test stack',
    routerBasename: '/',
    extensions: [],
    modes: [],
    // Global customizations win over a mode's: no guided tour pops up over the first image.
    customizationService: { 'ohif.tours': { $set: [] } },
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    // The test runs with a fresh browser profile every time: no first-visit dialog over the images.
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'local-archive',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'local-archive',
        configuration: {
          friendlyName: 'Local test archive (Orthanc DICOMweb)',
          name: 'orthanc',
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          // Orthanc's DICOMweb plugin honours includefield (its default set lacks StudyDescription).
          qidoSupportsIncludeField: true,
          supportsReject: false,
          supportsStow: false,
          dicomUploadEnabled: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          omitQuotationForMultipartRequest: true,
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        },
      },
    ],
    httpErrorHandler: error => {
      console.warn('DICOMweb request failed', error && error.status);
    },
  };
})();
