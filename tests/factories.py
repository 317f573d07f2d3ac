"""Small DICOM files built in tests, with exactly the tags a case needs."""
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian


def make_ct(path, stored: np.ndarray, *, bits_stored=16, signed=True, intercept="-1024",
            slope="1", implicit=False, photometric="MONOCHROME2", center=None, width=None,
            bits_allocated=16, **extra) -> Path:
    """Write a CT slice with exactly the tags given; stored values are written as is."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "ID_12345678"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.ImagePositionPatient = [-125, -125, 42.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    for key, value in extra.items():
        setattr(ds, key, value)
    dtype = {(16, True): "<i2", (16, False): "<u2", (8, False): "u1"}[(bits_allocated, signed)]
    ds.PixelData = stored.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
